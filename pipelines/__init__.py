"""Algorithms on plain torch tensors (no Ray), and the entry points that wire them onto actors/."""
