"""Models and what is built around them: loading and chat templates, the reward
model's likelihood head, the LSTM baseline, word2vec, the memory plan."""
