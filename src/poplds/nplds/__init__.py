"""Hierarchical non-stationary Poisson LDS (Park, Bohner & Macke, NeurIPS 2015). In progress:
the latent-path step (:mod:`poplds.nplds.inference`) is built and tested; fitting is not yet."""
