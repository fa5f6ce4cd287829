"""Let the vendored llama.cpp's Vulkan backend build against Debian 12's Vulkan headers (1.3.239).

    python3 old_vulkan_headers.py SRC

ggml-vulkan passes VK_EXT_layer_settings to vkCreateInstance, a debugging aid for the
validation layers (on only with GGML_VK_VALIDATE); that extension's types arrived in
Vulkan-Headers 1.3.261, which Debian 12 does not have. This drops that one argument; the
instance is created the same way otherwise.
"""

import re
import sys
from pathlib import Path

path = Path(sys.argv[1]) / "vendor/llama.cpp/ggml/src/ggml-vulkan/ggml-vulkan.cpp"
text = path.read_text()
pattern = re.compile(r"    VkBool32 enable_best_practice = layer_settings;\n.*?"
                     r"vk::InstanceCreateInfo instance_create_info\(vk::InstanceCreateFlags\{\}, &app_info, layers, "
                     r"extensions, &layer_setting_info\);", re.S)
patched, count = pattern.subn("    vk::InstanceCreateInfo instance_create_info(vk::InstanceCreateFlags{}, &app_info, "
                              "layers, extensions);", text)
if count != 1:
    sys.exit(f"old_vulkan_headers.py: the layer-settings block was not found in {path}")
path.write_text(patched.replace('extensions.push_back("VK_EXT_layer_settings");', "(void) 0;"))
print(f"patched {path.name}: no VK_EXT_layer_settings")
