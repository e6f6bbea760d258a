"""SafeSteer's shared pieces, beneath the four stage scripts.

The core a port lifts (torch and transformers, nothing else of the project but the error type):

    hooks       decoder_layers, add_vector            πt = π0 + c·r at block l, a forward pre-hook
    sampling    prefill, sample, decode_completions   the KV-cached sampler and the end-of-turn mask
    forcing     completion_logits                     teacher forcing: which logits predict completion token i
    losses      collapsed_kl, partial_kl, full_kl     the memory-lean reverse KLs on S
    chat        encode_chats, stop_token_ids, ...     the chat-template tokens of each family
    errors      UserError                             bad input: one line, exit 2

Around it: teacher (πt as one object), artifacts (the files the stages hand each other), directions (the
means r is made of), metrics (the judge and the statistics), cli, files and models (the plumbing);
scale/ (torchrun, FSDP2, checkpoints, dtype policy, teacher schedules) and port/ (benchmark files, guard
judges, lm-eval, run fingerprints). Nothing here imports a stage.
"""
