"""Independent PyTorch reference implementations used by parity tests."""
