// SHA-256 of a file (FIPS 180-4), to check graph files against the manifest's "sha256".
#pragma once

#include <string>

namespace medsam {

// Lower-case hex digest of the file's bytes; throws std::runtime_error when it cannot be read.
std::string sha256_file(const std::string& path);

}  // namespace medsam
