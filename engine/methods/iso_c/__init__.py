"""Iso-C: isotropic merging in the common subspace (Marczak et al., 2025)."""
