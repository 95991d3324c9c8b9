# FindXXHash: locates the system libxxhash (Debian/Ubuntu: libxxhash-dev; Fedora: xxhash-devel;
# Homebrew/conda: xxhash). CMake glue only; no xxHash code lives in this repository.
#
# Result variables:
#   XXHash_FOUND, XXHash_INCLUDE_DIR, XXHash_LIBRARY (may be empty), XXHash_VERSION
# Imported targets:
#   XXHash::headers  the headers only (enough with XXH_INLINE_ALL, which the core uses)
#   XXHash::XXHash   the shared/static library, when one was found
#
# Hints: XXHash_ROOT (CMake's <Package>_ROOT search), or XXHash_INCLUDE_DIR / XXHash_LIBRARY.

find_package(PkgConfig QUIET)
if(PkgConfig_FOUND)
  pkg_check_modules(PC_XXHash QUIET libxxhash)
endif()

find_path(XXHash_INCLUDE_DIR NAMES xxhash.h HINTS ${PC_XXHash_INCLUDE_DIRS})
find_library(XXHash_LIBRARY NAMES xxhash HINTS ${PC_XXHash_LIBRARY_DIRS})

if(XXHash_INCLUDE_DIR AND EXISTS "${XXHash_INCLUDE_DIR}/xxhash.h")
  file(STRINGS "${XXHash_INCLUDE_DIR}/xxhash.h" _xxhash_version_lines
       REGEX "^#define XXH_VERSION_(MAJOR|MINOR|RELEASE)[ \t]+[0-9]+")
  foreach(_part MAJOR MINOR RELEASE)
    string(REGEX REPLACE ".*#define XXH_VERSION_${_part}[ \t]+([0-9]+).*" "\\1" _xxhash_${_part}
           "${_xxhash_version_lines}")
  endforeach()
  set(XXHash_VERSION "${_xxhash_MAJOR}.${_xxhash_MINOR}.${_xxhash_RELEASE}")
  unset(_xxhash_version_lines)
endif()

include(FindPackageHandleStandardArgs)
# XXH3_128bits needs xxHash >= 0.8.0 (the first release with a stable XXH3 API).
find_package_handle_standard_args(XXHash
  REQUIRED_VARS XXHash_INCLUDE_DIR
  VERSION_VAR XXHash_VERSION)
mark_as_advanced(XXHash_INCLUDE_DIR XXHash_LIBRARY)

if(XXHash_FOUND AND XXHash_VERSION VERSION_LESS 0.8.0)
  message(STATUS "Found xxHash ${XXHash_VERSION}, but XXH3-128 needs >= 0.8.0; ignoring it")
  set(XXHash_FOUND FALSE)
endif()

if(XXHash_FOUND AND NOT TARGET XXHash::headers)
  add_library(XXHash::headers INTERFACE IMPORTED)
  set_target_properties(XXHash::headers PROPERTIES INTERFACE_INCLUDE_DIRECTORIES "${XXHash_INCLUDE_DIR}")
endif()
if(XXHash_FOUND AND XXHash_LIBRARY AND NOT TARGET XXHash::XXHash)
  add_library(XXHash::XXHash UNKNOWN IMPORTED)
  set_target_properties(XXHash::XXHash PROPERTIES
    IMPORTED_LOCATION "${XXHash_LIBRARY}"
    INTERFACE_INCLUDE_DIRECTORIES "${XXHash_INCLUDE_DIR}")
endif()
