"""textgen: a self-hostable implementation of the Creatify Text Generator API."""

__version__ = "0.1.0"
