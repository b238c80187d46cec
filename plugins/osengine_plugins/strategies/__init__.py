"""Built-in calibration strategies: osplus, smoothquant, minmax."""
