#!/usr/bin/env bash
# Build the C++ example: examples/cpp/build.sh BUILD_DIR  ->  BUILD_DIR/medsam_rt_cpp
#
# Needs cmake (>= 3.16) and a C++17 compiler. ONNX Runtime comes without a network download of its own:
#  - the library: the libonnxruntime.so.* that the onnxruntime Python wheel ships in onnxruntime/capi/
#    ($PYTHON, default: the repository's .venv/bin/python, then python3); onnxruntime-gpu's wheel gives --cuda;
#  - the C/C++ headers: Debian 13's libonnxruntime-dev package (its C API is backward compatible with newer
#    libraries), fetched with apt-get download through a private apt state (nothing is installed into /) from the
#    Debian mirror this machine's apt sources name, and unpacked with dpkg -x into BUILD_DIR/deps/.
#    Set ORT_INCLUDE_DIR to use headers you already have instead.
# JSON (nlohmann/json, Debian's nlohmann-json3-dev) and PNG in/out (stb_image / stb_image_write, libstb-dev) are
# header-only and fetched the same way (or JSON_INCLUDE_DIR / STB_INCLUDE_DIR: folders holding nlohmann/json.hpp
# and stb/stb_image.h).
# Idempotent: the downloaded .debs are reused ($MEDSAM_CPP_DEB_CACHE, default BUILD_DIR/deps, holds them).
set -euo pipefail

die() { echo "build.sh: error: $*" >&2; exit 1; }

debian_mirror() {  # the first Debian archive URI in the system's apt sources (one-line and deb822 formats)
  local f
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [ -r "$f" ] || continue
    awk '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i ~ /^[a-z+]+:\/\//) { print $i; break } }' "$f"
  done
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -r "$f" ] || continue
    awk 'tolower($1) == "uris:" { for (i = 2; i <= NF; i++) print $i }' "$f"
  done
}

# the Debian archive the .debs are fetched from: $DEBIAN_MIRROR, else the first .../debian URI of the apt sources
fetch_mirror() {
  echo "${DEBIAN_MIRROR:-$(debian_mirror | grep -E '/debian/?$' | head -n 1 || true)}"
}

# `build.sh --mirror` prints that archive and exits (tests/test_cpp.py checks it answers before building)
if [ "${1:-}" = "--mirror" ]; then fetch_mirror; exit 0; fi
[ $# -eq 1 ] || die "usage: examples/cpp/build.sh BUILD_DIR  (or --mirror)"
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
mkdir -p "$1"
build=$(cd "$1" && pwd)
deps="$build/deps"
cache="${MEDSAM_CPP_DEB_CACHE:-$deps}"
mkdir -p "$deps" "$cache"

# --- tools -----------------------------------------------------------------------------------------------------
missing=()
command -v cmake >/dev/null || missing+=("cmake (Debian/Ubuntu: apt-get install cmake)")
cxx="${CXX:-}"
if [ -z "$cxx" ]; then
  for c in c++ g++ clang++; do
    if command -v "$c" >/dev/null; then cxx=$(command -v "$c"); break; fi
  done
fi
[ -n "$cxx" ] && command -v "$cxx" >/dev/null || missing+=("a C++17 compiler (Debian/Ubuntu: apt-get install g++)")
command -v make >/dev/null || command -v ninja >/dev/null || missing+=("make (Debian/Ubuntu: apt-get install make)")
[ ${#missing[@]} -eq 0 ] || die "missing build tools: ${missing[*]}"

# --- the library, from the onnxruntime wheel -----------------------------------------------------------------------
python="${PYTHON:-}"
if [ -z "$python" ]; then
  if [ -x "$repo/.venv/bin/python" ]; then python="$repo/.venv/bin/python"; else python=python3; fi
fi
capi=$("$python" -c 'import importlib.util as u, os
s = u.find_spec("onnxruntime")
print(os.path.join(s.submodule_search_locations[0], "capi") if s else "")' 2>/dev/null) ||
  die "cannot run $python to find the onnxruntime wheel (set PYTHON)"
[ -n "$capi" ] || die "$python has no onnxruntime package (pip install onnxruntime, or set PYTHON)"
lib=$(ls "$capi"/libonnxruntime.so.* 2>/dev/null | sort -V | tail -n 1 || true)
[ -n "$lib" ] || die "no libonnxruntime.so.* in $capi: this onnxruntime wheel does not ship the shared library"
ortlib="$build/ort"
mkdir -p "$ortlib"
# the soname is libonnxruntime.so.1; ONNX Runtime loads provider libraries from the folder it was loaded from
ln -sfn "$lib" "$ortlib/libonnxruntime.so"
ln -sfn "$lib" "$ortlib/libonnxruntime.so.1"
for p in "$capi"/libonnxruntime_providers_*.so; do
  [ -e "$p" ] && ln -sfn "$p" "$ortlib/$(basename "$p")"
done

# --- the headers, from Debian 13's libonnxruntime-dev ---------------------------------------------------------------
# fetch_deb PKG: sets $deb to the newest cached PKG_*.deb in $cache, downloaded first (Debian trixie) if none
apt_ready=""
fetch_deb() {
  local pkg=$1
  deb=$(ls "$cache"/"${pkg}"_*.deb 2>/dev/null | sort -V | tail -n 1 || true)
  if [ -z "$deb" ]; then
    command -v apt-get >/dev/null && command -v dpkg >/dev/null ||
      die "no cached $pkg .deb: need apt-get + dpkg to fetch it (or see the *_INCLUDE_DIR variables above)"
    local apt="$deps/apt"
    opts=(-o "Dir::Etc::sourcelist=$apt/etc/sources.list" -o "Dir::Etc::sourceparts=$apt/etc/sources.list.d"
      -o "Dir::Etc::preferencesparts=$apt/etc/preferences.d" -o "Dir::State::Lists=$apt/lists"
      -o "Dir::State::status=$apt/status" -o "Dir::Cache=$apt/cache"
      -o "APT::Sandbox::User=$(id -un)")
    if [ -z "$apt_ready" ]; then
      local mirror keyring=/usr/share/keyrings/debian-archive-keyring.gpg
      mirror=$(fetch_mirror)
      [ -n "$mirror" ] ||
        die "no Debian mirror in /etc/apt/sources.list{,.d/*}; set DEBIAN_MIRROR=<URI> or the *_INCLUDE_DIR variables"
      [ -r "$keyring" ] || die "$keyring is missing (apt-get install debian-archive-keyring)"
      mkdir -p "$apt/etc/sources.list.d" "$apt/etc/preferences.d" "$apt/lists/partial" "$apt/cache/archives/partial"
      echo "deb [signed-by=$keyring] ${mirror%/} trixie main" >"$apt/etc/sources.list"
      : >"$apt/status"
      echo "build.sh: fetching from $mirror (Debian trixie)" >&2
      apt-get -q "${opts[@]}" update >"$apt/update.log" 2>&1 ||
        die "apt-get update against $mirror (trixie) failed; see $apt/update.log"
      apt_ready=1
    fi
    echo "build.sh: fetching $pkg" >&2
    (cd "$cache" && apt-get -q "${opts[@]}" download "$pkg" >"$apt/download-$pkg.log" 2>&1) ||
      die "apt-get download $pkg failed; see $apt/download-$pkg.log"
    deb=$(ls "$cache"/"${pkg}"_*.deb 2>/dev/null | sort -V | tail -n 1 || true)
    [ -n "$deb" ] || die "apt-get download left no ${pkg}_*.deb in $cache"
  fi
}

# headers PKG FILE VAR SUBDIR: sets $dir to a folder holding FILE: $VAR when set, else PKG's .deb unpacked into
# BUILD_DIR/deps/PKG (its usr/include/SUBDIR)
headers() {
  local pkg=$1 file=$2 var=$3 sub=$4
  dir="${!var:-}"
  if [ -n "$dir" ]; then
    [ -f "$dir/$file" ] || die "$var=$dir has no $file"
    return
  fi
  dir="$deps/$pkg/usr/include$sub"
  if [ ! -f "$dir/$file" ]; then
    fetch_deb "$pkg"
    rm -rf "${deps:?}/$pkg"
    dpkg -x "$deb" "$deps/$pkg"
    [ -f "$dir/$file" ] || die "$deb holds no $file"
  fi
}

headers libonnxruntime-dev onnxruntime_cxx_api.h ORT_INCLUDE_DIR /onnxruntime
include=$dir
headers nlohmann-json3-dev nlohmann/json.hpp JSON_INCLUDE_DIR ""
json_include=$dir
headers libstb-dev stb/stb_image.h STB_INCLUDE_DIR ""
stb_include=$dir
[ -z "$apt_ready" ] || rm -rf "$deps/apt/lists" "$deps/apt/cache"  # the package lists (~20 MB) served their purpose

# --- configure + build ----------------------------------------------------------------------------------------------
cmake -S "$here" -B "$build/cmake" -DCMAKE_BUILD_TYPE=Release -DCMAKE_CXX_COMPILER="$cxx" \
  -DORT_INCLUDE_DIR="$include" -DJSON_INCLUDE_DIR="$json_include" -DSTB_INCLUDE_DIR="$stb_include" \
  -DORT_LIB_DIR="$ortlib" -DCMAKE_RUNTIME_OUTPUT_DIRECTORY="$build" >"$build/cmake.log" ||
  { cat "$build/cmake.log" >&2; die "cmake configure failed"; }
cmake --build "$build/cmake" --parallel "${MEDSAM_CPP_JOBS:-2}" >>"$build/cmake.log" 2>&1 ||
  { tail -n 40 "$build/cmake.log" >&2; die "compilation failed (log: $build/cmake.log)"; }
[ -x "$build/medsam_rt_cpp" ] || die "the build left no $build/medsam_rt_cpp"
echo "built $build/medsam_rt_cpp (ONNX Runtime library $(basename "$lib") from $capi, headers $include)"
