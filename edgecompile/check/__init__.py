"""Checks against the PyTorch reference: the parity gate, integer exactness, placement, `verify`."""
