"""The detector as ``nn.Module``s: backbones, the scored RPN, the ORE RoI head with its
prototype store and clustering loss, the energy and the relabeller, and the Weibull fit
with its file format. Nothing here reads files of weights or knows about processes."""
