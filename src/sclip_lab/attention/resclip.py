"""Placeholder: this method is being written."""
