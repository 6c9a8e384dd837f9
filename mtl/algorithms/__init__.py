"""Meta-learning algorithms, one module each, registered by name."""
