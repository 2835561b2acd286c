"""A site's images: scanning sources, full-size image preprocessing, BloodMNIST, partitions, classes."""
