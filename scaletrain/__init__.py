"""scaletrain: a Hydra-configured ablation platform for LLM pre-training in PyTorch.

Shape legend, one for the whole package: tensor names carry their shape as a suffix (`x_BTD`, `w_EDF`), and
a letter means the same thing in every module.

    B batch (sequences)             T sequence positions            D d_model (residual width)
    C token-embedding width (n_embed; W_e maps C -> D)              V vocabulary
    H attention heads               K head dim (D / H)              P rotary pairs (K / 2)
    F MLP / expert hidden size      E routed experts (also: the leading dim of a stack of matrices)
    N tokens in a micro-batch (B*T) R routed choices per token (moe.top_k)
    S routed slots (R*N: one per token and choice)
    I, J rows and columns of a generic matrix (Newton-Schulz's X_IJ; in a grouped matmul x_SI @ w_EIJ:
         input and output features)
"""

__version__ = "0.1.0"
