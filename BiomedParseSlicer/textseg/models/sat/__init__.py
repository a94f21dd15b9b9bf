"""SAT (Segment Anything with Text): network, text tower and loader (torch is imported only by the submodules)."""
