"""Speculative decoding in the engine core: drafts (prompt lookup, a draft model) verified in the batch."""
