"""The arithmetic of batch norm, three ways: ``reference`` (the chapter's formula, the one to
read), ``fused`` (an autograd Function with the hand-derived backward, plain tensor ops) and
``cpp`` (bnlab's C++ kernel, built once per machine). ``bnlab.functional`` registers them and
picks between them; nothing here imports the rest of bnlab."""
