# Writes a C++ header holding the text of one file as a string constant, so that a program carries
# the exact text of a source file (the schema) without a copy living in the repository.
#   cmake -DINPUT=<file> -DOUTPUT=<header> -DSYMBOL=<name> -P EmbedText.cmake
file(READ ${INPUT} text)
# A raw string literal needs a delimiter that the text never contains.
set(delim "moert_embedded")
string(FIND "${text}" ")${delim}\"" clash)
if(NOT clash EQUAL -1)
  message(FATAL_ERROR "${INPUT} contains the raw-string delimiter ${delim}")
endif()
file(WRITE ${OUTPUT}.tmp
  "// Generated from ${INPUT} at build time; edit that file, not this one.\n"
  "#pragma once\n"
  "inline constexpr char ${SYMBOL}[] = R\"${delim}(${text})${delim}\";\n")
file(COPY_FILE ${OUTPUT}.tmp ${OUTPUT} ONLY_IF_DIFFERENT)
file(REMOVE ${OUTPUT}.tmp)
