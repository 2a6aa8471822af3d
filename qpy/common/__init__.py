"""Shared pieces with no privilege of their own."""
