// Run CVAT's browser decoder the way cvat-ui/plugins/sam's worker does, with onnxruntime-web
// (its WebAssembly backend) in Node: node ort_web_decode.cjs DECODER EMBEDDING.bin FEEDS.json
// FEEDS.json: {"coords": [[x, y], ...] (1024 frame), "labels": [...], "size": [h, w]}.
// Prints the output dims, type, bounds and the number of mask pixels set, as JSON.
const ort = require('onnxruntime-web');
const fs = require('fs');

ort.env.wasm.numThreads = 1;

(async () => {
  const [decoder, embeddingFile, feedsFile] = process.argv.slice(2);
  const spec = JSON.parse(fs.readFileSync(feedsFile, 'utf8'));
  const bytes = fs.readFileSync(embeddingFile);
  const embedding = new Float32Array(bytes.buffer, bytes.byteOffset, bytes.length / 4);
  const session = await ort.InferenceSession.create(fs.readFileSync(decoder));
  const n = spec.labels.length;
  const result = await session.run({
    image_embeddings: new ort.Tensor('float32', embedding, [1, 256, 64, 64]),
    point_coords: new ort.Tensor('float32', new Float32Array(spec.coords.flat()), [1, n, 2]),
    point_labels: new ort.Tensor('float32', new Float32Array(spec.labels), [1, n]),
    orig_im_size: new ort.Tensor('float32', spec.size),
    mask_input: new ort.Tensor('float32', new Float32Array(256 * 256), [1, 1, 256, 256]),
    has_mask_input: new ort.Tensor('float32', [0]),
  });
  const mask = result.masks.data;
  let inside = 0;
  for (let i = 0; i < mask.length; i += 1) if (mask[i] > 0) inside += 1;
  console.log(JSON.stringify({
    dims: result.masks.dims,
    type: result.masks.type,
    bounds: ['xtl', 'ytl', 'xbr', 'ybr'].map((k) => Number(result[k].data[0])),
    inside,
  }));
})().catch((err) => { console.error(`decode failed: ${err.message || err}`); process.exit(1); });
