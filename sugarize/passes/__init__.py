"""Graph passes: capture, match, rewrite (sugarize), strip, and their report."""
