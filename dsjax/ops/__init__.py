"""The math of DeepSeek-V2/V3 as pure functions on arrays.

Shape vocabulary, used in names (``x_btd``), einsum strings and docstrings throughout dsjax:

====  =========================================  ====  ==========================================
 b    batch                                       h    attention heads (n_h)
 t    query length                                n    per-head no-position q/k dim (d_h)
 s    key/value length                            r    per-head RoPE dim (d_h^R), shared by heads
 d    model width (hidden_size)                   c    compressed KV latent (kv_lora_rank, d_c)
 v    per-head value dim                          q    compressed query latent (q_lora_rank)
 e    routed experts (N_r)                        k    experts chosen per token (K_r)
 f    FFN width (dense or per expert)             m    tokens flattened (b*t), or token-expert pairs
====  =========================================  ====  ==========================================
"""
