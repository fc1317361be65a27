"""Diffeomorphic registration (Beg LDDMM) with velocity fields split across ranks."""
