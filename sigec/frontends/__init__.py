"""User-facing front ends of sigec."""
