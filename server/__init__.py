"""The predictor runtime: model repository, core inference path and protocol front doors."""
