"""Stitched linear dynamical system (Nonnenmacher, Turaga & Macke, NeurIPS 2017)."""
