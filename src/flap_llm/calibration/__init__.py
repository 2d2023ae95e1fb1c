"""The calibration walk: token windows, the layer-by-layer pass that feeds each layer its inputs (in memory, or
streamed from disk), the output-Fisher passes, and the split of windows over torch.distributed ranks."""
