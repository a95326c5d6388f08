"""PyTorch semantics of everything edgecompile compiles.

One definition, used by the parity oracle and importable by training code:
``pooling`` (sentence-transformers pooling), ``masks`` (block / head / neuron gates),
``router`` (encoder -> pooling -> projection -> distances -> argmin), ``student``
(the family wrappers whose forward is both exported and used as reference).
"""
