"""Several models behind one gateway: the models file, residency decided by the memory plan, the pool."""
