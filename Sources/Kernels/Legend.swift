// Kernels: the numeric building blocks of the engine, each forward next to its backward.
//
// Dimension legend (used in every shape comment in this folder):
//   T    tokens in a packed batch (rows)          C    channels (hidden size)
//   V    vocabulary size                          I    MLP intermediate size
//   NH   query heads                              NKV  key/value heads (grouped-query attention)
//   HS   head size                                Q    NH*HS + 2*NKV*HS (fused q|k|v row width)
//
// Conventions (after llm.c): backward kernels take gradient outputs first, then `dOut`, then
// the saved forward inputs. Gradients of parameters are accumulated (+=); gradients of
// activations are overwritten unless an argument says otherwise. Every per-row reduction runs in
// a fixed order that does not depend on how many rows are processed together or on the thread
// count, so a token's numbers are identical in a one-token decode step and in a large batch.
