# Project-wide compile flags applied per target, so consumers of the installed package never
# inherit our warning or sanitizer settings.

function(sagellm_kv_set_warnings target)
  if(CMAKE_CXX_COMPILER_ID MATCHES "GNU|Clang")
    target_compile_options(${target} PRIVATE -Wall -Wextra -Wconversion -Wsign-conversion -Wshadow
                                             -Wnon-virtual-dtor -Wpedantic)
    if(SAGELLM_KV_WERROR)
      target_compile_options(${target} PRIVATE -Werror)
    endif()
  endif()
endfunction()

if(SAGELLM_KV_SANITIZE)
  string(REPLACE ";" "," _sagellm_kv_san "${SAGELLM_KV_SANITIZE}")
  add_compile_options(-fsanitize=${_sagellm_kv_san} -fno-omit-frame-pointer -fno-sanitize-recover=all)
  add_link_options(-fsanitize=${_sagellm_kv_san})
endif()
