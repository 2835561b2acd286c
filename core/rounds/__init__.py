"""The federation plan, the aggregator's and the site's round state machines, their messages and events."""
