"""Networking for the download stage: address guard, bounded HTTP, limits, robots rules."""
