"""hashing: the bucket function (nft jhash twin) and the bucket -> owner map specification.

Pure, dependency-free, versioned; see docs/hashing.md.
"""
