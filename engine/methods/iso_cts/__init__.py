"""Iso-CTS: isotropic merging in common and task-specific subspaces (Marczak et al., 2025)."""
