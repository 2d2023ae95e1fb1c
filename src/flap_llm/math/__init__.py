"""The math, apart from any model walk: fluctuation metrics, streaming statistics, the standardized selection
of units, compensation, and the least-squares/OBS reconstruction. Pure functions on tensors."""
