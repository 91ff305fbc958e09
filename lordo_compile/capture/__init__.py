"""Capture: dynamo traces the step; recognised optimizers step through canonical ops."""
