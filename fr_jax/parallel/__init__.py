"""Mesh construction and the one logical-axis table that maps model axes onto it."""
