"""What both halves of chargen share: the artifact format and the `chargen` command.

``training/`` writes the artifact and ``service/`` serves it; neither imports the other. This
package depends only on torch and the standard library, and ships the bundled default model
(chargen/models/shakespeare.pt).
"""
