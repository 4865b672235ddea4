"""Service load balancing logic (pure): Maglev lookup tables (see maglev.py)."""
