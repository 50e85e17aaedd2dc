{
  "targets": [
    {
      "target_name": "imgmount",
      "sources": [
        "native/imgmount.c"
      ],
      "cflags": [
        "-O2",
        "-Wall",
        "-Wextra",
        "-Wno-unused-parameter",
        "-pthread"
      ],
      "ldflags": [
        "-pthread"
      ],
      "defines": [
        "_GNU_SOURCE",
        "NAPI_VERSION=8"
      ],
      "cflags_c": [
        "-std=gnu11"
      ]
    }
  ]
}
