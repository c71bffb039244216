"""The reference world: a small procedurally drawn world whose answers are known.

Shapes (the classes) in colours, on backgrounds that play the part of shifts. The embedded
models are trained on it, so that a flow run on the embedded default means something.
"""
