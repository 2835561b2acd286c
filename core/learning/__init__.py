"""Models, fixed features and their cache, the site trainer, DP training steps, the server optimizer."""
