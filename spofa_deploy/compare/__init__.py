"""`spofa compare`: every method trained the same way, side by side, and its report."""
