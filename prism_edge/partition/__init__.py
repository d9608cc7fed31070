"""Partition plans, Segment Means routing and attention masks."""
