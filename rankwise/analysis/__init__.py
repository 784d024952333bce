"""Low-rank analysis: spectra, Matrix Nuclear-Norm, intrinsic dimension (see docs/analysis.md).

Submodules are imported on use (`rankwise.analysis.spectra`, `.mnn`, `.intrinsic_dim`) so that
`import rankwise` stays light.
"""
