"""Passes over the Dynamo graph, before AOTAutograd: the MLP, the vocabulary projection +
loss and attention, with the helpers they share (tokenwise: what an op does to the token
dims; projections: linear layers and their adapters; chunking: chunk bodies and loops)."""
