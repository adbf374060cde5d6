"""Graph passes: capture, match, rewrite (sugarize), strip, their report, and the conversion config."""
