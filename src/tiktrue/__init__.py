"""TikTrue: one large language model across the ordinary PCs of a LAN."""

__version__ = "0.1.0"
