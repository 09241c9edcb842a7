"""Real files of user data for the tests, written by the product's own example writers."""

from aesearch.examples import wine_table, write_digit_images

__all__ = ["wine_table", "write_digit_images"]
