"""selfreward: self-rewarding language model alignment (Yuan et al., 2024)."""

__version__ = "0.1.0"
