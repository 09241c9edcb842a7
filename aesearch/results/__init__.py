"""What a search left, read back: the report (read, tables, figures, rendering) and reproduce.
"""
